//! The export stage's work: turn a trained run into files other tools load.
//!
//! Each folder under `<run>/export/` is one format, switched on and off in `[export]`:
//! - `adapter/`: the PEFT adapter as trained ([`adapter`]);
//! - `merged/`: LoRA folded into the dequantized base, HF safetensors ([`merged`]);
//! - `nf4/`: the merged model re-quantized to bitsandbytes NF4 ([`nf4`]);
//! - `gguf/`: GGUF files for llama.cpp plus an Ollama `Modelfile` ([`gguf`], [`ollama`]).
//!
//! The merged weights are checked against base + adapter before anything derived
//! from them is written ([`check`], `merge_check.json`). Every folder carries a
//! README model card and `tuner-export.json` ([`card`]). A folder is written as
//! `<name>.tmp/` and renamed when complete (llm.c's write-then-rename), so a folder
//! that exists is whole; on resume, folders whose `tuner-export.json` carries the
//! current fingerprint are kept.
//!
//! References: PEFT `LoraLayer.merge` / `get_delta_weight` (W' = W + scale·B·A),
//! transformers `save_pretrained` (shards and index), arch-spec §4 and §5, llama.cpp
//! `convert_hf_to_gguf.py` and the GGUF specification (ggml `docs/gguf.md`).

pub mod adapter;
pub mod card;
pub mod check;
pub use crate::gguf::export as gguf;
pub mod merged;
pub mod nf4;
pub mod ollama;

use crate::model::CausalLm;
use crate::pipeline::RunContext;
use crate::util;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

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

/// Copy the tokenizer and generation files of an HF folder that exist (never the weights or config).
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<Vec<String>> {
    const NAMES: [&str; 10] = [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "generation_config.json",
    ];
    let mut copied = Vec::new();
    for n in NAMES {
        let src = from.join(n);
        if src.is_file() {
            std::fs::copy(&src, to.join(n)).with_context(|| format!("cannot copy {}", src.display()))?;
            copied.push(n.to_string());
        }
    }
    Ok(copied)
}

/// Load the base model as the recipe trained it (4-bit when it was) with the run's adapter attached.
pub fn load_trained(ctx: &RunContext, base_dir: &Path, device: tch::Device) -> Result<Box<dyn CausalLm>> {
    let adapter_dir = ctx.stage_dir("train").join("adapter");
    let mut model = crate::model::open::load_for_recipe(base_dir, &ctx.recipe.recipe, device)?;
    crate::model::open::apply_adapter(model.as_mut(), &adapter_dir)
        .with_context(|| format!("cannot apply the trained adapter {}", adapter_dir.display()))?;
    Ok(model)
}

/// The examples the merge gate scores: the eval split, else the first train examples; at most
/// [`check::MAX_EXAMPLES`].
pub fn gate_examples(ctx: &RunContext) -> Result<(Vec<crate::data::shards::Example>, &'static str)> {
    let tok_dir = ctx.stage_dir("tokenize");
    let mut eval = crate::train::read_split(&tok_dir, "eval")?;
    let source = if eval.is_empty() {
        eval = crate::train::read_split(&tok_dir, "train")?;
        "train"
    } else {
        "eval"
    };
    eval.truncate(check::MAX_EXAMPLES);
    if eval.is_empty() {
        bail!("the tokenize stage has no examples to check the merge on");
    }
    Ok((eval, source))
}

/// Run the export stage in `dir` (the run's `export/` folder) for fingerprint `fp`;
/// returns every file written, relative to `dir`.
pub fn run(ctx: &RunContext, dir: &Path, fp: &str) -> Result<Vec<PathBuf>> {
    let r = &ctx.recipe.recipe;
    let ex = &r.export;
    let model_rec = crate::stages::fetch::model_record(ctx)?;
    let adapter_src = ctx.stage_dir("train").join("adapter");
    if !adapter_src.join("adapter_model.safetensors").is_file() {
        bail!("{} has no trained adapter; run the train stage first", adapter_src.display());
    }
    // Everything that can be refused is refused before any work.
    let gguf_types: Vec<gguf::GgufType> = ex.gguf.clone();
    if !gguf_types.is_empty() {
        gguf::check_supported(&model_rec.dir)?;
    }
    if ex.ollama && gguf_types.is_empty() {
        bail!("[export] ollama = true needs a GGUF file to point at: set [export] gguf = [\"q8_0\"] (or [\"f16\"])");
    }
    let store = ex.merged_dtype.kind();

    // Leftovers of an interrupted run are never complete: remove them.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") && e.path().is_dir() {
                std::fs::remove_dir_all(e.path()).ok();
            }
        }
    }
    let prov = card::Provenance::collect(ctx, fp, &model_rec)?;
    let mut written: Vec<String> = Vec::new();

    if ex.adapter {
        let folder = dir.join("adapter");
        if is_current(&folder, fp) {
            eprintln!("export: adapter/ is up to date");
        } else {
            adapter::export(ctx, &adapter_src, dir, &prov)?;
            eprintln!("export: wrote adapter/");
        }
        written.push("adapter".into());
    } else if dir.join("adapter").exists() {
        std::fs::remove_dir_all(dir.join("adapter")).ok();
    }

    let needs_merge = ex.merged || ex.nf4 || !gguf_types.is_empty();
    let check_path = dir.join(MERGE_CHECK_FILE);
    if needs_merge {
        let merged_name = if ex.merged { "merged" } else { MERGE_WORK };
        let merged_dir = dir.join(merged_name);
        let gate_done =
            util::read_json::<check::MergeCheck>(&check_path).ok().is_some_and(|c| c.fingerprint == fp && c.passed);
        if is_current(&merged_dir, fp) && gate_done {
            eprintln!("export: {merged_name}/ is up to date");
        } else {
            let device = r.train.device.resolve();
            let compute = crate::model::open::compute_kind(r.model.dtype, device);
            let t0 = std::time::Instant::now();
            let stage = Staging::new(dir, merged_name)?;
            let mut trained = load_trained(ctx, &model_rec.dir, device)?;
            let summary =
                merged::write_merged(trained.as_ref(), &model_rec.dir, stage.path(), store, merged::MAX_SHARD_BYTES)?;
            eprintln!(
                "export: merged {} LoRA modules into {} tensors ({}) in {:.1}s",
                summary.merged_modules.len(),
                summary.tensors,
                merged::dtype_name(store),
                t0.elapsed().as_secs_f64()
            );
            ctx.check_interrupted("export stopped")?;
            // The gate: the files just written, loaded back, against base + adapter.
            let (examples, source) = gate_examples(ctx)?;
            // The merged tensors are written. On the CPU base + adapter is scored with its 4-bit
            // weights dequantized once (the same numbers every forward computes); on a GPU that
            // would hold a second dense copy of the base next to the merged model, so it is not.
            if device == tch::Device::Cpu {
                crate::model::dequantize_linears(trained.as_mut(), compute);
            }
            let merged_model = crate::model::load(
                stage.path(),
                &crate::model::LoadOptions { dtype: compute, device, quantize: None, cuda_kernels: true },
            )?;
            let m = check::measure(trained.as_ref(), merged_model.as_ref(), &examples, device);
            drop(merged_model);
            drop(trained);
            let rec =
                check::MergeCheck::new(m, source, ex.max_merge_loss_delta, fp, ex.merged_dtype.name(), compute, device);
            util::write_json_atomic(&check_path, &rec)?;
            eprintln!(
                "export: merge check on {} {source} examples: loss {:.6} (adapter) vs {:.6} (merged), delta {:.2e}, max |Δlogit| {:.2e}",
                rec.examples, rec.adapter_loss, rec.merged_loss, rec.loss_delta, rec.max_abs_logit_diff
            );
            check::enforce(&rec)?;
            let readme = card::readme(ctx, card::Format::Merged, &model_rec, Some(&rec));
            card::finish(stage.path(), card::Format::Merged, &prov, &readme)?;
            stage.commit()?;
        }
        let rec: check::MergeCheck = util::read_json(&check_path)?;
        if ex.merged {
            written.push("merged".into());
        } else if dir.join("merged").exists() {
            std::fs::remove_dir_all(dir.join("merged")).ok();
        }
        ctx.check_interrupted("export stopped")?;

        if ex.nf4 {
            let folder = dir.join("nf4");
            if is_current(&folder, fp) {
                eprintln!("export: nf4/ is up to date");
            } else {
                let stage = Staging::new(dir, "nf4")?;
                let n = nf4::write_nf4(&merged_dir, stage.path(), merged::MAX_SHARD_BYTES)?;
                let readme = card::readme(ctx, card::Format::Nf4, &model_rec, Some(&rec));
                card::finish(stage.path(), card::Format::Nf4, &prov, &readme)?;
                stage.commit()?;
                eprintln!("export: wrote nf4/ ({n} linears quantized)");
            }
            written.push("nf4".into());
        } else if dir.join("nf4").exists() {
            std::fs::remove_dir_all(dir.join("nf4")).ok();
        }
        ctx.check_interrupted("export stopped")?;

        if !gguf_types.is_empty() {
            let folder = dir.join("gguf");
            if is_current(&folder, fp) {
                eprintln!("export: gguf/ is up to date");
            } else {
                let stage = Staging::new(dir, "gguf")?;
                let name = if r.run.name.is_empty() { "model".to_string() } else { r.run.name.clone() };
                for t in &gguf_types {
                    let t0 = std::time::Instant::now();
                    let s = gguf::write_gguf(&merged_dir, &stage.path().join(t.file_name()), *t, &name)?;
                    eprintln!(
                        "export: wrote gguf/{} ({} tensors, {:.1}s)",
                        t.file_name(),
                        s.tensors,
                        t0.elapsed().as_secs_f64()
                    );
                    ctx.check_interrupted("export stopped")?;
                }
                if ex.ollama {
                    let target =
                        if gguf_types.contains(&gguf::GgufType::Q8_0) { gguf::GgufType::Q8_0 } else { gguf_types[0] };
                    let tok = crate::data::tokenizer::Tok::load(&merged_dir)?;
                    let text = ollama::modelfile(&target.file_name(), &r.prompt, &tok);
                    util::write_atomic(&stage.path().join("Modelfile"), text.as_bytes())?;
                }
                let readme = card::readme(ctx, card::Format::Gguf, &model_rec, Some(&rec));
                card::finish(stage.path(), card::Format::Gguf, &prov, &readme)?;
                stage.commit()?;
            }
            written.push("gguf".into());
        } else if dir.join("gguf").exists() {
            std::fs::remove_dir_all(dir.join("gguf")).ok();
        }
        if !ex.merged && merged_dir.exists() {
            std::fs::remove_dir_all(&merged_dir).with_context(|| format!("cannot remove {}", merged_dir.display()))?;
        }
    } else {
        for n in ["merged", "nf4", "gguf"] {
            if dir.join(n).exists() {
                std::fs::remove_dir_all(dir.join(n)).ok();
            }
        }
        std::fs::remove_file(&check_path).ok();
    }

    let mut files = Vec::new();
    for w in &written {
        files.extend(files_under(&dir.join(w), dir)?);
    }
    if needs_merge {
        files.push(PathBuf::from(MERGE_CHECK_FILE));
    }
    crate::pipeline::record(
        &ctx.run_dir,
        "export",
        serde_json::json!({
            "folders": written,
            "merge_check": if needs_merge { util::read_json::<serde_json::Value>(&check_path).ok() } else { None },
        }),
    )?;
    Ok(files)
}
