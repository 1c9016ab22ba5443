//! Export stage: the trained run as a PEFT adapter, a merged HF model, an NF4
//! (bitsandbytes) model and GGUF files with an Ollama Modelfile, as `[export]` asks.
//! The work is in `crate::export`; this stage gathers its inputs from the run folder (the
//! fetched model, the trained adapter, the merge gate's examples, and what the model cards
//! say about the run) and records what was written.

use crate::export::card::RunFacts;
use crate::export::{check, ExportInputs, GateExamples};
use crate::pipeline::{self, run_dir, RunContext, Stage};
use crate::recipe::Source;
use crate::util;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The export stage.
pub struct Export;

impl Stage for Export {
    fn name(&self) -> &'static str {
        "export"
    }

    fn inputs(&self, ctx: &RunContext) -> Result<Value> {
        // The train fingerprint (and through it the whole recipe up to training) is
        // chained in by the executor; only [export] is this stage's own.
        Ok(json!({ "export": ctx.recipe.recipe.export }))
    }

    fn run(&self, ctx: &RunContext, dir: &Path, fp: &str) -> Result<Vec<PathBuf>> {
        let model = super::fetch::model_record(ctx)?;
        let adapter_dir = ctx.stage_dir("train").join("adapter");
        let inputs = ExportInputs {
            recipe: &ctx.recipe.recipe,
            base_dir: &model.dir,
            adapter_dir: &adapter_dir,
            // Only a merge reads them (the whole train split, when there is no eval split).
            gate: if ctx.recipe.recipe.export.needs_merge() {
                gate_examples(ctx)?
            } else {
                GateExamples { examples: vec![], split: "eval" }
            },
            facts: run_facts(ctx, &model)?,
            fingerprint: fp,
            interrupted: &ctx.interrupted,
        };
        let out = crate::export::run(&inputs, dir)?;
        pipeline::record(&ctx.run_dir, "export", json!({ "folders": out.folders, "merge_check": out.merge_check }))?;
        Ok(out.files)
    }
}

/// The examples the merge gate scores: the eval split, else the first train examples; at most
/// [`check::MAX_EXAMPLES`].
pub fn gate_examples(ctx: &RunContext) -> Result<GateExamples> {
    let mut examples = super::tokenize::read_split(ctx, "eval")?;
    let split = if examples.is_empty() {
        examples = super::tokenize::read_split(ctx, "train")?;
        "train"
    } else {
        "eval"
    };
    examples.truncate(check::MAX_EXAMPLES);
    Ok(GateExamples { examples, split })
}

/// `{"fingerprint", "artifacts"}` of a finished stage.
fn manifest_summary(ctx: &RunContext, stage: &str) -> Result<Value> {
    let dir = ctx.stage_dir(stage);
    let m = run_dir::read_manifest(&dir)
        .with_context(|| format!("{} has no manifest; the {stage} stage has not finished", dir.display()))?;
    let artifacts: BTreeMap<String, String> = m.artifacts.into_iter().map(|a| (a.path, a.sha256)).collect();
    Ok(json!({ "fingerprint": m.fingerprint, "artifacts": artifacts }))
}

/// What the model cards and `tuner-export.json` say about the run.
fn run_facts(ctx: &RunContext, model: &super::fetch::ModelRecord) -> Result<RunFacts> {
    let r = &ctx.recipe.recipe;
    let stats: Value = util::read_json(&ctx.stage_dir("tokenize").join("stats.json")).unwrap_or(Value::Null);
    let splits = ["train", "eval"]
        .into_iter()
        .filter_map(|s| Some((s.to_string(), stats[s]["rows"].as_u64()?, stats[s]["tokens"].as_u64()?)))
        .collect();
    Ok(RunFacts {
        base_name: match ctx.recipe.source(&r.model.source) {
            Source::Hub { repo } => repo,
            Source::Local(_) => r.model.source.clone(),
        },
        commit: model.commit.clone(),
        model_type: model.model_type.clone(),
        base_files: model.files.clone(),
        fetch: manifest_summary(ctx, "fetch")?,
        train: manifest_summary(ctx, "train")?,
        dataset: super::fetch::data_record(ctx).ok().map(|d| serde_json::to_value(d).unwrap_or(Value::Null)),
        splits,
        eval_report: util::read_json(&ctx.stage_dir("evaluate").join("report.json")).ok(),
    })
}
