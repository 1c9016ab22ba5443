//! The export stage's work: turn a trained run into files other tools load. The stage
//! (`stages/export.rs`) resolves the inputs from the run folder ([`ExportInputs`]); [`run`]
//! writes the merged model behind the merge gate, then loops over the table of the other
//! formats ([`FORMATS`]): stage the folder, write, add the card, commit.
//!
//! Each folder under `<run>/export/` is one format, switched on and off in `[export]`:
//! - `adapter/`: the PEFT adapter as trained, with the tokenizer files ([`adapter`]);
//! - `merged/`: LoRA folded into the dequantized base, HF safetensors ([`merged`]);
//! - `nf4/`: the merged model re-quantized to bitsandbytes NF4 ([`nf4`]);
//! - `gguf/`: GGUF files for llama.cpp plus an Ollama `Modelfile` ([`gguf`], [`ollama`]).
//!
//! The tokenizer files of `adapter/`, `merged/` and `nf4/` (and the GGUF metadata) carry the
//! trained prompt format as their chat template ([`chat_template`]).
//!
//! The merged weights are checked against base + adapter before anything derived
//! from them is written ([`check`], `merge_check.json`). Every folder carries a
//! README model card and `tuner-export.json` ([`card`]). A folder is written as
//! `<name>.tmp/` and renamed when complete (llm.c's write-then-rename), so a folder
//! that exists is whole; on resume, folders whose `tuner-export.json` carries the
//! current fingerprint are kept.
//!
//! References: PEFT `LoraLayer.merge` / `get_delta_weight` (W' = W + scale·B·A),
//! transformers `save_pretrained` (shards and index), docs/model-math.md §4 and §5, llama.cpp
//! `convert_hf_to_gguf.py` and the GGUF specification (ggml `docs/gguf.md`).

pub mod adapter;
pub mod card;
pub mod chat_template;
pub mod check;
pub use crate::gguf::export as gguf;
pub mod merged;
pub mod nf4;
pub mod ollama;

use crate::data::shards::Example;
use crate::model::CausalLm;
use crate::recipe::{ExportSection, Recipe};
use crate::util;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// File name of the provenance record in every exported folder.
pub const PROVENANCE_FILE: &str = "tuner-export.json";

/// File name of the merge quality-gate record in the export folder.
pub const MERGE_CHECK_FILE: &str = "merge_check.json";

/// Name of the merged folder built only as the source of nf4/GGUF when `merged = false`.
const MERGE_WORK: &str = ".merged-work";

/// A folder being written as `<parent>/<name>.tmp/` and renamed to `<parent>/<name>/`
/// by [`Staging::commit`]; an abandoned one is removed by the next run.
pub struct Staging {
    tmp: PathBuf,
    dest: PathBuf,
}

impl Staging {
    /// Start `<parent>/<name>.tmp/` afresh.
    pub fn new(parent: &Path, name: &str) -> Result<Staging> {
        let tmp = parent.join(format!("{name}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        Ok(Staging { tmp, dest: parent.join(name) })
    }

    /// The folder to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Replace `<name>/` by the finished folder.
    pub fn commit(self) -> Result<PathBuf> {
        if self.dest.exists() {
            std::fs::remove_dir_all(&self.dest).with_context(|| format!("cannot replace {}", self.dest.display()))?;
        }
        std::fs::rename(&self.tmp, &self.dest)
            .with_context(|| format!("cannot rename {} to {}", self.tmp.display(), self.dest.display()))?;
        Ok(self.dest)
    }
}

/// Whether `folder` is a finished export of the run whose export fingerprint is `fp`.
pub fn is_current(folder: &Path, fp: &str) -> bool {
    util::read_json::<serde_json::Value>(&folder.join(PROVENANCE_FILE))
        .ok()
        .is_some_and(|v| v["recipe_fingerprint"].as_str() == Some(fp))
}

/// Every file under `folder`, as paths relative to `base`, sorted.
pub fn files_under(folder: &Path, base: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![folder.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(base).unwrap_or(&p).to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

pub use merged::copy_tokenizer_files;

/// Load the base model as the recipe trained it (4-bit when it was) with the adapter attached.
pub fn load_trained(r: &Recipe, base_dir: &Path, adapter_dir: &Path, device: tch::Device) -> Result<Box<dyn CausalLm>> {
    let mut model = crate::model::open::load_for_recipe(base_dir, r, device)?;
    crate::model::open::apply_adapter(model.as_mut(), adapter_dir)
        .with_context(|| format!("cannot apply the trained adapter {}", adapter_dir.display()))?;
    Ok(model)
}

/// The examples the merge gate scores: the eval split, else the first train examples; at most
/// [`check::MAX_EXAMPLES`].
pub struct GateExamples {
    pub examples: Vec<Example>,
    /// "eval" or "train".
    pub split: &'static str,
}

/// What the export needs, resolved from the run folder by the export stage.
pub struct ExportInputs<'a> {
    pub recipe: &'a Recipe,
    /// The base model's HF folder.
    pub base_dir: &'a Path,
    /// The trained adapter (PEFT folder).
    pub adapter_dir: &'a Path,
    pub gate: GateExamples,
    /// What the model cards and `tuner-export.json` say about the run.
    pub facts: card::RunFacts,
    /// The export fingerprint: folders carrying it are up to date.
    pub fingerprint: &'a str,
    /// Set by Ctrl-C.
    pub interrupted: &'a AtomicBool,
}

/// What an export wrote.
pub struct Exported {
    /// Every file, relative to the export folder.
    pub files: Vec<PathBuf>,
    /// The format folders, in order.
    pub folders: Vec<String>,
    /// The merge gate's record, when something needed the merged model.
    pub merge_check: Option<check::MergeCheck>,
}

/// A format written from the merged model or the adapter into its own folder.
struct FormatSpec {
    /// The folder name.
    name: &'static str,
    card: card::Format,
    /// Whether `[export]` asks for it.
    wanted: fn(&ExportSection) -> bool,
    /// Write the folder's files (not the card) into the staging folder.
    write: fn(&Job, &Path) -> Result<()>,
}

/// The formats besides `merged/` (which the merge gate guards, [`ensure_merged`]), in order.
const FORMATS: [FormatSpec; 3] = [
    FormatSpec { name: "adapter", card: card::Format::Adapter, wanted: |ex| ex.adapter, write: write_adapter },
    FormatSpec { name: "nf4", card: card::Format::Nf4, wanted: |ex| ex.nf4, write: write_nf4 },
    FormatSpec { name: "gguf", card: card::Format::Gguf, wanted: |ex| !ex.gguf.is_empty(), write: write_gguf },
];

/// One export in progress: the inputs and, once written and checked, the merged model.
struct Job<'a> {
    inp: &'a ExportInputs<'a>,
    prov: card::Provenance,
    /// The merged folder (`merged/` or the work folder) and its gate record.
    merged: Option<(PathBuf, check::MergeCheck)>,
}

/// Export into `dir` (the run's `export/` folder) every format `[export]` asks for; folders
/// already written under this fingerprint are kept, the others removed.
pub fn run(inp: &ExportInputs, dir: &Path) -> Result<Exported> {
    let ex = &inp.recipe.export;
    if !inp.adapter_dir.join("adapter_model.safetensors").is_file() {
        bail!("{} has no trained adapter; run the train stage first", inp.adapter_dir.display());
    }
    // Everything that can be refused is refused before any work.
    if !ex.gguf.is_empty() {
        gguf::check_supported(inp.base_dir)?;
    }
    if ex.ollama && ex.gguf.is_empty() {
        bail!("[export] ollama = true needs a GGUF file to point at: set [export] gguf = [\"q8_0\"] (or [\"f16\"])");
    }
    // Leftovers of an interrupted run are never complete: remove them.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") && e.path().is_dir() {
                std::fs::remove_dir_all(e.path()).ok();
            }
        }
    }
    let mut job = Job { inp, prov: card::Provenance::new(inp.recipe, inp.fingerprint, &inp.facts), merged: None };
    let needs_merge = ex.needs_merge();
    // The adapter, then the merged model behind its gate, then what is derived from it.
    let (before, after) = FORMATS.split_at(1);
    let mut folders = write_formats(&job, dir, before)?;
    if needs_merge {
        job.merged = Some(ensure_merged(&job, dir)?);
        if ex.merged {
            folders.push("merged".into());
        }
    } else {
        std::fs::remove_file(dir.join(MERGE_CHECK_FILE)).ok();
    }
    if !ex.merged && dir.join("merged").exists() {
        std::fs::remove_dir_all(dir.join("merged")).ok();
    }
    folders.extend(write_formats(&job, dir, after)?);
    let work = dir.join(MERGE_WORK);
    if !ex.merged && work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("cannot remove {}", work.display()))?;
    }
    let mut files = Vec::new();
    for w in &folders {
        files.extend(files_under(&dir.join(w), dir)?);
    }
    if needs_merge {
        files.push(PathBuf::from(MERGE_CHECK_FILE));
    }
    Ok(Exported { files, folders, merge_check: job.merged.map(|m| m.1) })
}

/// Write (or keep, when current) each format of `specs` that `[export]` asks for, and remove
/// the folders of those it does not; returns the folders kept.
fn write_formats(job: &Job, dir: &Path, specs: &[FormatSpec]) -> Result<Vec<String>> {
    let inp = job.inp;
    let mut folders = vec![];
    for f in specs {
        let folder = dir.join(f.name);
        if !(f.wanted)(&inp.recipe.export) {
            if folder.exists() {
                std::fs::remove_dir_all(&folder).ok();
            }
            continue;
        }
        if is_current(&folder, inp.fingerprint) {
            eprintln!("export: {}/ is up to date", f.name);
        } else {
            let stage = Staging::new(dir, f.name)?;
            (f.write)(job, stage.path())?;
            let readme = card::readme(inp.recipe, &inp.facts, f.card, job.merged.as_ref().map(|m| &m.1));
            card::finish(stage.path(), f.card, &job.prov, &readme)?;
            stage.commit()?;
        }
        folders.push(f.name.to_string());
        crate::error::check_interrupted(inp.interrupted, "export stopped")?;
    }
    Ok(folders)
}

/// The merged model (`merged/`, or a work folder when only nf4/GGUF need it), written and
/// checked against base + adapter unless this fingerprint's folder and passed gate exist.
fn ensure_merged(job: &Job, dir: &Path) -> Result<(PathBuf, check::MergeCheck)> {
    let (inp, ex) = (job.inp, &job.inp.recipe.export);
    let fp = inp.fingerprint;
    let merged_name = if ex.merged { "merged" } else { MERGE_WORK };
    let merged_dir = dir.join(merged_name);
    let check_path = dir.join(MERGE_CHECK_FILE);
    let gate_done =
        util::read_json::<check::MergeCheck>(&check_path).ok().is_some_and(|c| c.fingerprint == fp && c.passed);
    if is_current(&merged_dir, fp) && gate_done {
        eprintln!("export: {merged_name}/ is up to date");
        return Ok((merged_dir, util::read_json(&check_path)?));
    }
    let r = inp.recipe;
    let device = r.train.device.resolve();
    let compute = crate::model::open::compute_kind(r.model.dtype, device);
    let store = ex.merged_dtype.kind();
    let t0 = std::time::Instant::now();
    let stage = Staging::new(dir, merged_name)?;
    let mut trained = load_trained(r, inp.base_dir, inp.adapter_dir, device)?;
    let summary = merged::write_merged(trained.as_ref(), inp.base_dir, stage.path(), store, merged::MAX_SHARD_BYTES)?;
    chat_template::write(stage.path(), &r.prompt)?;
    eprintln!(
        "export: merged {} LoRA modules into {} tensors ({}) in {:.1}s",
        summary.merged_modules.len(),
        summary.tensors,
        merged::dtype_name(store),
        t0.elapsed().as_secs_f64()
    );
    crate::error::check_interrupted(inp.interrupted, "export stopped")?;
    // The gate: the files just written, loaded back, against base + adapter.
    let gate = &inp.gate;
    if gate.examples.is_empty() {
        bail!("the tokenize stage has no examples to check the merge on");
    }
    // On the CPU base + adapter is scored with its 4-bit weights dequantized once (the same
    // numbers every forward computes); on a GPU that would hold a second dense copy of the base
    // next to the merged model, so it is not.
    if device == tch::Device::Cpu {
        crate::model::dequantize_linears(trained.as_mut(), compute);
    }
    let merged_model = crate::model::load(
        stage.path(),
        &crate::model::LoadOptions { dtype: compute, device, quantize: None, cuda_kernels: true },
    )?;
    let m = check::measure(trained.as_ref(), merged_model.as_ref(), &gate.examples, device);
    drop(merged_model);
    drop(trained);
    let rec =
        check::MergeCheck::new(m, gate.split, ex.max_merge_loss_delta, fp, ex.merged_dtype.name(), compute, device);
    util::write_json_atomic(&check_path, &rec)?;
    eprintln!(
        "export: merge check on {} {} examples: loss {:.6} (adapter) vs {:.6} (merged), delta {:.2e}, max |Δlogit| {:.2e}",
        rec.examples, gate.split, rec.adapter_loss, rec.merged_loss, rec.loss_delta, rec.max_abs_logit_diff
    );
    check::enforce(&rec)?;
    let readme = card::readme(r, &inp.facts, card::Format::Merged, Some(&rec));
    card::finish(stage.path(), card::Format::Merged, &job.prov, &readme)?;
    stage.commit()?;
    crate::error::check_interrupted(inp.interrupted, "export stopped")?;
    Ok((merged_dir, rec))
}

/// `adapter/`: the PEFT adapter as trained, with the base's tokenizer files carrying the trained
/// prompt format.
fn write_adapter(job: &Job, out: &Path) -> Result<()> {
    adapter::write(job.inp.adapter_dir, out)?;
    copy_tokenizer_files(job.inp.base_dir, out)?;
    chat_template::write(out, &job.inp.recipe.prompt)?;
    eprintln!("export: wrote adapter/");
    Ok(())
}

fn merged_dir<'a>(job: &'a Job) -> &'a Path {
    &job.merged.as_ref().expect("nf4 and GGUF are written after the merged model").0
}

/// `nf4/`: the merged model re-quantized to bitsandbytes NF4.
fn write_nf4(job: &Job, out: &Path) -> Result<()> {
    let n = nf4::write_nf4(merged_dir(job), out, merged::MAX_SHARD_BYTES)?;
    eprintln!("export: wrote nf4/ ({n} linears quantized)");
    Ok(())
}

/// `gguf/`: one GGUF file per `[export] gguf` type, and an Ollama Modelfile when asked.
fn write_gguf(job: &Job, out: &Path) -> Result<()> {
    let r = job.inp.recipe;
    let types = &r.export.gguf;
    let merged = merged_dir(job);
    let name = if r.run.name.is_empty() { "model".to_string() } else { r.run.name.clone() };
    for t in types {
        let t0 = std::time::Instant::now();
        let s = gguf::write_gguf(merged, &out.join(t.file_name()), *t, &name)?;
        eprintln!("export: wrote gguf/{} ({} tensors, {:.1}s)", t.file_name(), s.tensors, t0.elapsed().as_secs_f64());
        crate::error::check_interrupted(job.inp.interrupted, "export stopped")?;
    }
    if r.export.ollama {
        let target = if types.contains(&gguf::GgufType::Q8_0) { gguf::GgufType::Q8_0 } else { types[0] };
        let tok = crate::data::tokenizer::Tok::load(merged)?;
        let text = ollama::modelfile(&target.file_name(), &r.prompt, &tok);
        util::write_atomic(&out.join("Modelfile"), text.as_bytes())?;
    }
    Ok(())
}
